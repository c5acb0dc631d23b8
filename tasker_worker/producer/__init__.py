"""The producer's side: ``AsyncClient`` and ``Client`` send steps and read their outcomes."""
