"""The web console for tenants: runs, budgets, packages and the audit chain (issue 21)."""
