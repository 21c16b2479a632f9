"""The offline Whop double: the part of Whop's REST API (v1) the product uses, a hosted checkout and a
management page, and Standard-Webhooks-signed event delivery with Whop's retry policy. Run it with
`python -m sandbox.whop`; see sandbox/whop/README.md."""
