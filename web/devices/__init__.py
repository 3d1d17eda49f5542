"""The device pages: /devices/ and /devices/<id>/.

    views.py    device_list (filter form, pages, htmx table), device_detail, device_revoke
    queries.py  the device page's timeline, telemetry figures and health chart
    model_metrics.py  the app's model metrics per hour, with the release each hour was on
"""
