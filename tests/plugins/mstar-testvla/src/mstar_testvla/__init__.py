"""mstar-testvla: a tiny vision-language-action model, packaged exactly as a third-party
mstar model plugin, that uses every engine feature the real models need (see
`mstar_testvla.model`). Importing the package imports no torch; the model lives in
`mstar_testvla.model`."""
