"""The rows `make chaos` must print (scripts/chaos.py fails when one is missing or failed).

Kept apart from the helpers so that scripts/chaos.py can read it without importing the tests.
"""

# Fault scenarios: one row each in the reliability table.
SCENARIOS = (
    "worker child SIGKILL",
    "worker SIGKILL (whole pod)",
    "poison message (kills its worker)",
    "pod stop (SIGTERM, soft shutdown)",
    "Redis SIGKILL while publishing and consuming",
    "PostgreSQL outage (60 s, during transactions)",
    "beat: two at once, holder SIGKILL, standby sends",
    "bad input (11 kinds of bad message)",
    "load: DB-writing tasks, worker-low SIGKILL",
    "Redis Sentinel: master SIGKILL, replica promoted",
)

# Security checks: groups of rows in the security table (path tried, answer expected, seen).
SECURITY = (
    "Flower basic auth (direct and through nginx)",
    "Redis password",
    "secrets in logs (worker, beat, Flower; TwelveData provider)",
)
