"""The access page at /access/ (admin; views.py: access): API tokens, enrollment tokens and the
public signing keys. Who may do what is web.roles, not this room."""
