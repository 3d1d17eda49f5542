"""The model registry. Views, serializers, admin and commands call the functions below, and
nothing else writes registry state. Every refusal raises registry.errors.ApiError with a stable
`code`, so the API, the CLI and the admin all report the same reason.

    lookups.py    model_get, version_get, artifact_get (or a 404 naming what is missing)
    hardware.py   hardware_create
    versions.py   model_create, version_create (counters), require_draft
    health.py     health_contract_validate: the health contract a version may carry;
                  health_contract_check_model: a contract against a model's inputs and outputs
    onnx_check.py onnx_validate (streamed ONNX check), onnx_io (declared inputs and outputs)
    tflite_check.py  tflite_validate (the TFLite flatbuffer's identifier and root)
    artifacts.py  the artifact store, artifact_upload (hashing, budget, ONNX and TFLite checks), deleting one
    release_check.py  release_check: every artifact's format has a precheck runtime (or the
                  contract says "precheck": "none"), each ONNX artifact against the health
                  contract, and the agent's precheck run on each ONNX and TFLite artifact, before
                  a release is signed
    releases.py   version_release (signing the manifest), deprecate, revoke, deleting a draft
    validity.py   release_refusal: a revoked or expired release is sent to no device
    aliases.py    alias_set (moving an alias), aliases_list (with history), parse_instant
    tokens.py     API tokens: token_create, tokens_revoke, token_revoke
    downloads.py  the artifact download URL and the download responses
    keys.py       the release and rollout signing keys
    audit.py      the audit log's one writer and reader
"""
