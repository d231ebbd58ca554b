"""ModalityBank on NVFlare: the server controller holding the generator and bank, the site
executor holding the discriminators, the privacy guard and ledger, and job tooling."""
