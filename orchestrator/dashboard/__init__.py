"""``orch dashboard``: a live web view of the runs, workers and schedules in one Redis.

``app`` (the Starlette application), ``routes`` (its handlers), ``views`` (what each page shows, read through
the run store), ``graph_view`` (the DAG collapsed to what a browser can draw),
``live`` (server-sent change events), ``actions`` (the buttons, each the CLI's own
function), ``security`` (logins, CSRF, the bind check) and ``command`` (the CLI
command). Needs the ``dashboard`` extra: ``pip install "orch[dashboard]"``.
"""
