"""Domain services: every rule of users, models and trainings, independent of HTTP."""
