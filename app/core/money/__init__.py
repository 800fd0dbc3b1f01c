"""Money: wallet, keys, rate limits and their Lua scripts; `reserve()`/`authorize()` → Hold.

The key layout (hash tags, global views) is documented in one place: app/core/money/layout.py.
"""

from __future__ import annotations

from app.core.money.hold import Hold, Settled, Short, authenticate, authorize, reserve, settled

__all__ = ["Hold", "Settled", "Short", "authenticate", "authorize", "reserve", "settled"]
