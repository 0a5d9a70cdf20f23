"""The service layer: the one place the CLI, the REST API and Python callers go through.

Nothing here imports typer or fastapi.
"""
