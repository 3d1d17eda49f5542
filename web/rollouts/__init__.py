"""The rollout pages: /rollouts/, a rollout's page and its actions, and the new-rollout wizard.

    views.py     rollout_list, rollout_detail, rollout_live (the page's htmx refresh),
                 rollout_action (the catalogue's buttons)
    queries.py   the rollout page's reads: waves, gates, failures, the model health card, confirmations
    model_health.py  per wave, the control-group gate's figures: judged (audit log) or live (cached)
    progress.py  progress buckets and counts, for the list, the rollout page and the overview
    wizard.py    the wizard's views: rollout_new (form, review, create), rollout_preview (htmx)
    preview.py   the wizard's reads: the target preview and the review's dry run
"""
