"""Commands: orchestrate the engine, return result dataclasses. Never print, never exit."""
