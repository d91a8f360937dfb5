"""Constrained decoding: regex, JSON schema, any-JSON, EBNF and structural-tag grammars on
xgrammar.

grammar_spec.py     what a request asks for (GrammarSpec), from SamplingParams
grammar_backend.py  compiles specs off the scheduler's thread, cached per spec
matcher.py          per sequence: masks disallowed tokens, accepts sampled ones, jump-forward
"""
