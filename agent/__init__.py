"""modelfleet device agent.

Plain Python: this package must never import Django, Celery or boto3. It is also the single
source of truth for the wire format (topics, payload schemas, DSSE envelopes) that the server
imports.
"""

__version__ = "0.1.0"
