"""The Pyro backend: Pyro's ELBO as a loss, a torch optimizer over Pyro's parameter store."""

from __future__ import annotations


class PyroBackend:
    name, suffix = "pyro", ""

    def check(self, setup) -> None:
        pass

    def trainer(self, setup):
        from ppl_gen.core.train import Trainer, make_elbo

        cfg, spec, g = setup.cfg, setup.spec, setup.guide
        elbo = make_elbo(cfg.elbo, jit=cfg.jit, num_particles=cfg.num_particles, alpha=cfg.renyi_alpha)
        return Trainer(spec.model, g.fn, setup.dataset.train, elbo, lr=cfg.lr, batch_size=cfg.batch_size,
                       seed=cfg.seed, validate=cfg.validate, local_params=g.local_params, local_lr=g.local_lr,
                       update=g.update, param_lr=spec.param_lr, buffers=spec.buffers, device=setup.device)

    def extra_config(self, setup) -> dict:
        return {}

    def sync(self, trainer) -> None:
        pass
