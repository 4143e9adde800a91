"""Getting data into the raw layer: the synthetic CRM generator and importers for real files."""
