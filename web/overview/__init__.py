"""The overview page at /.

    views.py    overview: charts of the fleet by version and hardware, automatic decisions
    queries.py  fleet_counts, running_rollouts
"""
