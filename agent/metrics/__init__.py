"""The model's own figures, as the application that runs it sees them.

The application sends StatsD lines to a local UDP socket (`[metrics] statsd_listen`, default
127.0.0.1:8125); the agent folds them, per model and per release, into mergeable quantile
sketches (DDSketch) and counters. Telemetry reports each window; a trial judges the new release
on the same figures. Modules:
  statsd.py     parse StatsD / DogStatsD lines (pure)
  aggregate.py  one window of one (model, release): counters and sketches, to and from JSON
  book.py       the agent's book of windows, fed by the listener, read by telemetry and the trial
  listener.py   the UDP socket and its thread
"""
