"""Shared pytest setup. Tests run offline: nothing may reach the Hugging Face Hub, on CI or on a fresh machine."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
