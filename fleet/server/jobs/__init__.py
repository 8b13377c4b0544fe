"""Jobs: one lifecycle, dispatch by claiming rows, retries as due times."""
