"""The Flower app's ClientApp (pyproject.toml, `[tool.flwr.app.components]`).

Its code is installed with fedtune (fedtune/client/), where the client nodes of `fedtune client`
and the virtual clients of `fedtune simulate` import it too.
"""

from fedtune.client.app import app

__all__ = ["app"]
