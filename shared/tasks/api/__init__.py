"""The HTTP API of waardhaven-tasks (services/api): `tasks.api.app:create_api`."""
