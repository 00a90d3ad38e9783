"""The Flower app's ServerApp (pyproject.toml, `[tool.flwr.app.components]`).

Its code is installed with fedtune (fedtune/server/); this component names the app's folder, where
`flwr run` ships configs/, so that a relative experiment file is found in the app bundle.
"""

from pathlib import Path

from fedtune.server.app import server_app

app = server_app(Path(__file__).resolve().parents[1])
