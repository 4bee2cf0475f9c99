"""Zero-trust login: verified ID tokens, enforced MFA, least-privilege roles."""
