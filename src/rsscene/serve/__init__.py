"""``rsscene serve``: an HTTP API and a one-page web UI for a checkpoint.

The app lives in :mod:`rsscene.serve.app` (``create_app``); it needs the ``serve`` extra
(fastapi, uvicorn, python-multipart), so nothing is imported here.
"""
