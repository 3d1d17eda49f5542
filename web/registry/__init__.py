"""The registry pages: /registry/ (models), a model with its aliases, a version.

    views.py    model_list, model_detail, version_detail, version_health (the contract as JSON);
                the version changes (release, deprecate, revoke) and alias_move
    queries.py  the version page's reads: health contract summary, metadata rows, the rollouts
                of the version and how they failed, how many devices run it
"""
