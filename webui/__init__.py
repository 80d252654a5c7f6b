"""The web UI and JSON API: a Flask app in its own process, on the daemon's database."""
