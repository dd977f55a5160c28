"""Flask extensions shared by the portal's blueprints (initialised per app in ``create_app``).

The limiter is module-level so blueprints can decorate their views at import time; ``init_app``
gives it a fresh in-memory storage for each app (one app per process in production).
"""
from __future__ import annotations

from flask_limiter import Limiter
from flask_limiter.util import get_remote_address
from flask_login import LoginManager
from flask_wtf.csrf import CSRFProtect

csrf = CSRFProtect()
login_manager = LoginManager()
limiter = Limiter(key_func=get_remote_address, storage_uri="memory://", default_limits=[])
