"""The serving wing: one scheduler owns the model; visitors' sessions, the memory budget, the
session store, the engine the UI and the API call, the OpenAI-compatible API, metrics.

    scheduler.py    the one owner of the model: prompt chunks, batched steps, tasks, queue limits
    sessions.py     what a visitor keeps, following a ticket, Stop; the memory budget
    store.py        saved work (SQLAlchemy: SQLite by default, PostgreSQL for several processes)
    engine.py       the loaded model behind the scheduler, the models folder, visitors' sessions
    completions.py  API requests on the scheduler, the prefix cache of kept states
    metrics.py      Prometheus metrics fed by the scheduler
    api/            the OpenAI-compatible routes (FastAPI)
"""
