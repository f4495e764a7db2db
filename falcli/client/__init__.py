"""HTTP client for the service's management API.

``Client(base_url, key)`` has one resource per noun (``blobs``, ``apps``, ``runners``,
``keys``) plus ``health()`` / ``whoami()``; ``deploy_bundle`` uploads the missing blobs of a
bundle and streams its deploy. Every failure is a ``falcli.errors.ClientError``.
"""

from falcli.client._client import Client
from falcli.client.deploy import BundleLike, DeployEvent, deploy_bundle, upload_missing

__all__ = ["BundleLike", "Client", "DeployEvent", "deploy_bundle", "upload_missing"]
