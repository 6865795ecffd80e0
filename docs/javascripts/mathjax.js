// MathJax 3 settings for pymdownx.arithmatex (generic mode): typeset only the formulas that
// arithmatex marked, delimited by \( \) and \[ \]. MathJax itself is served from
// assets/mathjax/ (copied from the django-static-mathjax package by docs/hooks/npllm_docs.py):
// no CDN, the formulas render offline.
window.MathJax = {
  tex: {
    inlineMath: [["\\(", "\\)"]],
    displayMath: [["\\[", "\\]"]],
    processEscapes: true,
    processEnvironments: true
  },
  options: {
    ignoreHtmlClass: ".*|",
    processHtmlClass: "arithmatex"
  }
};

// Material's instant navigation swaps pages without reloading: typeset the new page too.
document$.subscribe(() => {
  if (window.MathJax && MathJax.startup && MathJax.startup.promise) {
    MathJax.startup.promise.then(() => {
      MathJax.typesetClear();
      MathJax.texReset();
      return MathJax.typesetPromise();
    });
  }
});
