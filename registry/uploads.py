"""Streaming upload handling: every uploaded file is spooled to a temporary file on disk while its
SHA-256 and length are computed chunk by chunk, so the web process never holds an artifact in
memory, however large it is."""

from __future__ import annotations

import hashlib

from django.core.files.uploadhandler import TemporaryFileUploadHandler


class HashingUploadHandler(TemporaryFileUploadHandler):
    """TemporaryFileUploadHandler that also hashes on the way to disk.

    The resulting TemporaryUploadedFile carries `sha256` (hex) and `length` attributes, so the
    registry never has to read the file a second time to checksum it.
    """

    chunk_size = 1024 * 1024

    def new_file(self, *args, **kwargs):
        super().new_file(*args, **kwargs)
        self._sha256 = hashlib.sha256()
        self._length = 0

    def receive_data_chunk(self, raw_data, start):
        self._sha256.update(raw_data)
        self._length += len(raw_data)
        return super().receive_data_chunk(raw_data, start)

    def file_complete(self, file_size):
        uploaded = super().file_complete(file_size)
        uploaded.sha256 = self._sha256.hexdigest()
        uploaded.length = self._length
        return uploaded
