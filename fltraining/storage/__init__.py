"""Storage: the MongoDB connection, the embedded store and GridFS access."""
