// The signup form: choosing Whop turns off what Whop cannot sell (inputs marked data-whop="0": yearly
// billing, add-ons, tiers without a Whop plan); choosing card turns them on again. The server checks
// the same rules, so this only saves a round trip and an error message.
(function () {
  "use strict";
  var form = document.getElementById("signup-form");
  if (!form) return;
  function apply() {
    var whop = form.querySelector('input[name="payment_provider"][value="whop"]:checked') !== null;
    form.querySelectorAll('[data-whop="0"]').forEach(function (input) {
      input.disabled = whop;
      if (whop && input.type === "radio") input.checked = false;
      if (whop && input.type === "number") input.value = "0";
    });
    if (whop) {
      var monthly = form.querySelector('input[name="interval"][value="month"]');
      if (monthly) monthly.checked = true;
    }
  }
  form.querySelectorAll('input[name="payment_provider"]').forEach(function (input) {
    input.addEventListener("change", apply);
  });
  apply();
})();
