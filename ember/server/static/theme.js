// Sets the colour theme before the first paint. A classic (non-module) script in <head>, because
// module scripts run only after the page is parsed, which would flash the other theme first.
(function () {
  var theme = null;
  try { theme = localStorage.getItem('ember.theme'); } catch (e) { /* storage disabled */ }
  if (theme !== 'light' && theme !== 'dark') {
    theme = window.matchMedia && matchMedia('(prefers-color-scheme: dark)').matches ? 'dark' : 'light';
  }
  document.documentElement.dataset.theme = theme;
})();
