"""Streaming upload handling: every uploaded file is spooled to a temporary file on disk while its
SHA-256 and length are computed chunk by chunk, so the web process never holds an artifact in
memory, however large it is."""

from __future__ import annotations

import hashlib

from django.core.files.uploadhandler import StopUpload, TemporaryFileUploadHandler
from django.db.models import Max

ARTIFACT_UPLOAD_VIEW = "registry:artifact-list"


class HashingUploadHandler(TemporaryFileUploadHandler):
    """TemporaryFileUploadHandler that also hashes on the way to disk.

    The resulting TemporaryUploadedFile carries `sha256` (hex) and `length` attributes, so the
    registry never has to read the file a second time to checksum it.

    On the artifact endpoint, a file that grows past the largest hardware budget is dropped
    mid-stream (the rest of the body is read and discarded, nothing more is written) and
    `request.upload_over_cap` is set to that budget, so a runaway upload cannot fill the disk.
    """

    chunk_size = 1024 * 1024

    def new_file(self, *args, **kwargs):
        super().new_file(*args, **kwargs)
        self._sha256 = hashlib.sha256()
        self._length = 0
        self._cap = self._artifact_cap()

    def _artifact_cap(self) -> int | None:
        match = getattr(self.request, "resolver_match", None)
        if match is None or match.view_name != ARTIFACT_UPLOAD_VIEW:
            return None
        from registry.models import HardwareTarget  # the handler is loaded before apps are ready

        return HardwareTarget.objects.aggregate(cap=Max("max_artifact_bytes"))["cap"]

    def receive_data_chunk(self, raw_data, start):
        if self._cap is not None and self._length + len(raw_data) > self._cap:
            self.request.upload_over_cap = self._cap
            raise StopUpload(connection_reset=False)
        self._sha256.update(raw_data)
        self._length += len(raw_data)
        return super().receive_data_chunk(raw_data, start)

    def file_complete(self, file_size):
        uploaded = super().file_complete(file_size)
        uploaded.sha256 = self._sha256.hexdigest()
        uploaded.length = self._length
        return uploaded
