"""The web UI under /ui: server-rendered pages over the same database and roles as the API (api/ui/app.py)."""
