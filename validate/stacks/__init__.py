"""Trace scripts that run inside one stack's own venv (see memplan.validate.stack_envs), with the
pins each venv is built from (`<stack>.txt`)."""
