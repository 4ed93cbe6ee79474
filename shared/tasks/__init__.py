"""waardhaven-tasks: background processing for the Waardhaven AutoIndex."""
