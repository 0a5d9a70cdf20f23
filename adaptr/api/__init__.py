"""The REST API (``adaptr serve``): a FastAPI front end over :mod:`adaptr.services`.

It adds transport only (routing, auth, paging, uploads, jobs); every operation is a service
call with the same spec models as the CLI.
"""

from adaptr.api.app import create_app

__all__ = ["create_app"]
