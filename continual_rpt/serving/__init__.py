"""Serving a prompt bank: one frozen backbone answering every entry's task, over HTTP, while the bank grows.

`state` holds what is served (the loaded backbone and entries); `app` the HTTP layer; `client` a client.
A layer above evaluation, routing and the bank: nothing below imports it.
"""
