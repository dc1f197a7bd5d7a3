"""Tokenized bank deposits (HKMA Project Ensemble): issuance, redemption and atomic interbank
settlement over the Harbour ledger.

``calendar`` (business days and settlement windows), ``accounts`` (chart of accounts and
postings) and ``domain`` (decide/evolve) are pure; the service, consumer and app add the I/O.
"""
