"""The watchdog: `core` (client address, admission, failed-login counting),
`bans` (the persisted ban list), `banctl` (`tunneld bans` and its control endpoints)."""

from tunneld.home.watchdog.core import Watchdog

__all__ = ["Watchdog"]
