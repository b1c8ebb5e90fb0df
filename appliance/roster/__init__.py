"""People and their cards: the roster model and its import from the school's CSV/XLSX exports."""
