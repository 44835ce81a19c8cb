"""Wire schemas: one family (create / patch / public) per resource."""
