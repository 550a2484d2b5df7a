"""No secret (env *KEY*/*TOKEN*/*SECRET*/*PASSWORD*, ~/.netrc) in any file a run writes or in
anything it prints, whichever way it got into the run: interpolated from the environment,
typed on the command line, or echoed by an error."""

from __future__ import annotations

from caitlab.secrets import hide_in_argv
from conftest import clean_env

ENV_SECRETS = {"WANDB_API_KEY": "0123456789abcdef0123456789abcdef01234567",
               "MY_SERVICE_TOKEN": "tok-planted-98765", "DB_PASSWORD": "pw-planted-55555",
               "S3_SECRET": "s3-planted-24680"}
NETRC_LOGIN, NETRC_PASSWORD = "netrc-login-4711", "netrc-pass-31337"
ALL = [*ENV_SECRETS.values(), NETRC_LOGIN, NETRC_PASSWORD]

TINY = ("model.embed_dim=32", "model.depth=1", "trainer.max_epochs=1",
        "trainer.limit_train_batches=2", "trainer.limit_val_batches=1",
        "trainer.limit_test_batches=1", "trainer.log_every_n_steps=1")


def test_no_secret_in_any_file_or_output(tmp_path, forkserver):
    home, out = tmp_path / "home", tmp_path / "out"
    home.mkdir(), out.mkdir()
    (home / ".netrc").write_text(f"machine example.org\n  login {NETRC_LOGIN}\n"
                                 f"  password {NETRC_PASSWORD}\n")
    (home / ".netrc").chmod(0o600)
    env = clean_env(HOME=str(home), WANDB_MODE="offline", **ENV_SECRETS)

    runs = [
        # a run that completes with every logger, secrets interpolated and typed literally
        forkserver.run(out, *TINY, "logger=[csv,wandb,tensorboard]",
                       "+logger.wandb.notes=${oc.env:MY_SERVICE_TOKEN}",
                       f"+tags=[{ENV_SECRETS['DB_PASSWORD']},{NETRC_PASSWORD},{NETRC_LOGIN}]",
                       "+s3=${oc.env:S3_SECRET}", env=env),
        # a config error that quotes the value
        forkserver.run(out, *TINY, "logger=csv", "optim.lr=${oc.env:DB_PASSWORD}", env=env,
                       check=False),
        # a crash whose message and traceback carry a secret (error.log, summary.json)
        forkserver.run(out, *TINY, "logger=csv", "+callbacks.boom._target_=helpers.SignalAtStep",
                       f"+callbacks.boom.sig={ENV_SECRETS['S3_SECRET']}", env=env,
                       check=False),
    ]
    assert [r.returncode for r in runs] == [0, 2, 1], [r.stderr[-2000:] for r in runs]
    assert "optim.lr='<redacted>' must be a number" in runs[1].stderr
    (crash,) = [p.parent for p in out.rglob("error.log")]
    assert "has no attribute '<redacted>'" in (crash / "error.log").read_text()
    assert "has no attribute '<redacted>'" in (crash / "summary.json").read_text()

    printed = "".join(r.stdout + r.stderr for r in runs)
    files = [p for p in out.rglob("*") if p.is_file()]
    names = {p.name for p in files}
    # the places a leak would be: they exist, so the scan below can fail
    assert {"config.yaml", "overrides.yaml", "summary.json", "metrics.csv", "train.log",
            "error.log", "hydra.yaml"} <= names
    assert any(p.suffix == ".wandb" for p in files)
    assert any(p.name.startswith("events.out.tfevents") for p in files)
    assert any("<redacted>" in p.read_text() for p in files if p.name == "config.yaml")
    for secret in ALL:
        assert secret not in printed, secret
        for path in files:
            assert secret.encode() not in path.read_bytes(), (secret, path)


def test_secrets_typed_on_the_command_line_become_references(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / ".netrc").write_text(f"machine example.org login {NETRC_LOGIN} "
                                     f"password {NETRC_PASSWORD}\n")
    (tmp_path / ".netrc").chmod(0o600)  # Python's netrc refuses a readable one
    pw = ENV_SECRETS["DB_PASSWORD"]
    argv = hide_in_argv([f"+a={pw}", f"+b=x{NETRC_PASSWORD}y", "c=1", "-cd", f"/conf/{pw}",
                         f"--config-name={pw}"], environ={"DB_PASSWORD": pw})
    assert argv == ["+a=${oc.env:DB_PASSWORD}", "+b=x${netrc:example.org,password}y", "c=1",
                    "-cd", f"/conf/{pw}", f"--config-name={pw}"]  # flags left as they are

    from omegaconf import OmegaConf

    from caitlab.resolvers import register_resolvers

    register_resolvers()
    assert OmegaConf.create({"b": argv[1][3:]}).b == f"x{NETRC_PASSWORD}y"
