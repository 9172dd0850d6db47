"""The contract: the typed spec read from a stack file, the facts it relies on (catalog), where
things live on a host (layout), secret references, folder digests and errors. Imports nothing
else of the project; everything else imports it."""
