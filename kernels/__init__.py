"""The secure kernelspec (untrusted zone): how a user's kernel is started."""
