"""Authentication, authorization and audit: one gate that every HTTP route and DIMSE
handler passes through, so that policies change in one place and never in the routes."""
