"""The dashboard in a real browser, against `fltraining serve` as `make run` starts it."""

import asyncio
from collections.abc import AsyncIterator, Iterator

import pytest
from playwright.async_api import expect

from tests.browser import LIVE_MS, Browsing, browsing
from tests.fl_clients import HttpApi, model_bytes, start_clients, stop_clients, wait_for_notification
from tests.helpers import PASSWORD, create_training, register, upload_model
from tests.processes import ServiceProcess

pytestmark = pytest.mark.browser

XSS_NAMES = ("<img src=x onerror=alert(1)>", "<script>alert('model')</script>")


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    """One service process for the module, with notifications to the simulated clients on this machine."""
    data = tmp_path_factory.mktemp("dashboard")
    env = {"FLTRAINING_NOTIFICATION_ALLOW_LOOPBACK": "true", "FLTRAINING_DOCS_DIR": str(data / "no-docs"),
           "FLTRAINING_NOTIFICATION_BACKOFF_SECONDS": "0.05"}
    with ServiceProcess(data, env=env) as process:
        yield process


@pytest.fixture
async def http(service: ServiceProcess) -> AsyncIterator[HttpApi]:
    """The service's API, as the simulated clients and the test's own set-up call it."""
    api = HttpApi(service.base_url)
    yield api
    await api.close()


@pytest.fixture
async def web(service: ServiceProcess) -> AsyncIterator[Browsing]:
    """A headless chromium on the service."""
    async for opened in browsing(service.base_url):
        yield opened


async def test_sign_in_with_a_wrong_then_the_right_password(http: HttpApi, web: Browsing) -> None:
    alice = await register(http, first_name="Alice", last_name="Liddell")
    watched = await web.open("/")
    page = watched.page
    await expect(page.get_by_role("heading", name="Sign in")).to_be_visible()
    await watched.screenshot("sign-in")
    # With the keyboard alone: the name field has the focus, Tab goes on, Enter signs in.
    await expect(page.get_by_label("Username")).to_be_focused()
    await page.keyboard.type(alice.username)
    await page.keyboard.press("Tab")
    await page.keyboard.type("not the password")
    await page.keyboard.press("Enter")
    await expect(page.get_by_role("alert")).to_have_text("Invalid credentials.")
    await watched.screenshot("sign-in-refused")
    await expect(page.get_by_label("Password")).to_be_focused()  # selected, to be typed again
    await page.keyboard.type(PASSWORD)
    await page.keyboard.press("Enter")
    await expect(page.get_by_role("heading", name="Trainings")).to_be_visible()
    await expect(page.locator("#who")).to_have_text(f"Signed in as Alice Liddell ({alice.username})")
    stored = await page.evaluate("() => [sessionStorage.getItem('fltraining.token'), localStorage.length, document.cookie]")
    assert stored[0] and stored[0] != alice.token and stored[1:] == [0, ""]
    # A reload keeps the sign-in (sessionStorage); signing out forgets it and ends the token.
    await page.reload()
    await expect(page.get_by_role("heading", name="Trainings")).to_be_visible()
    await page.get_by_role("button", name="Sign out").click()
    await expect(page.get_by_role("heading", name="Sign in")).to_be_visible()
    assert await page.evaluate("() => sessionStorage.getItem('fltraining.token')") is None
    assert (await http.get("/api/users/myself/", headers={"Authorization": f"Token {stored[0]}"})).status == 401
    watched.assert_clean(allowed_api_errors=("401 /api/sessions/",))


async def test_trainings_table_shows_names_as_text(http: HttpApi, web: Browsing) -> None:
    actor = await register(http, actor=True)
    bob = await register(http, first_name="Bob")
    for name in (*XSS_NAMES, "digits"):
        model_id = await upload_model(http, actor, name=name)
        await create_training(http, actor, model_id, clients=[bob.id])
    watched = await web.signed_in(actor)
    page = watched.page
    rows = page.locator("table.trainings tbody tr")
    await expect(rows).to_have_count(3)
    # Newest first; a name that looks like HTML is shown literally, and nothing in it ran.
    await expect(rows.nth(0).get_by_role("link")).to_have_text("digits")
    for name in XSS_NAMES:
        await expect(page.get_by_role("link", name=name, exact=True)).to_be_visible()
    await expect(rows.nth(0)).to_contain_text("Initial")
    await expect(rows.nth(0)).to_contain_text("0 / 3")
    await expect(rows.nth(0)).to_contain_text(f"Bob ({bob.username})")
    assert await page.locator("main img, main script").count() == 0
    await watched.screenshot("trainings")
    # The training's page, reached by its link, shows the name as its heading, as text.
    await page.get_by_role("link", name=XSS_NAMES[0], exact=True).click()
    await expect(page.get_by_role("heading", name=XSS_NAMES[0], exact=True)).to_be_visible()
    assert await page.locator("main img").count() == 0
    await watched.screenshot("training-with-markup-name")
    watched.assert_clean()


async def test_training_watched_live_until_completed(http: HttpApi, web: Browsing) -> None:
    actor = await register(http, actor=True)
    clients = await start_clients(http, 3, silent=True)  # they upload when the test says so
    try:
        model_id = await upload_model(http, actor, content=model_bytes(), name="digits")
        training_id = await create_training(http, actor, model_id, target_num_updates=2,
                                            clients=[client.account.id for client in clients])
        watched = await web.signed_in(actor, f"/trainings/{training_id}")
        page = watched.page
        await expect(page.get_by_role("heading", name="digits")).to_be_visible()
        await page.evaluate("() => { window.notReloaded = true; }")
        facts, events = page.locator("dl.facts"), page.locator("ol.events")
        count = page.locator(".progress-count")

        await page.get_by_role("button", name="Start").click()
        await expect(facts).to_contain_text("Ongoing", timeout=LIVE_MS)
        await wait_for_notification(clients, "UPDATE_ROUND_START")
        await expect(count).to_have_text("0 / 3 arrived", timeout=LIVE_MS)
        await clients[0].train(clients[0].received[-1]["body"])
        await expect(count).to_have_text("1 / 3 arrived", timeout=LIVE_MS)
        first = page.locator("ul.participants li").filter(has_text=clients[0].account.username)
        await expect(first).to_contain_text("arrived")
        await expect(page.locator("ul.participants li.expected")).to_have_count(2)
        await watched.screenshot("training-live-round-0")

        chart = page.get_by_role("img", name="accuracy chart")
        for round_, points in ((0, 3), (1, 6)):
            await wait_for_notification(clients, "UPDATE_ROUND_START", round_ + 1)
            for client in clients[1:] if round_ == 0 else clients:
                await client.train(client.received[-1]["body"])
            await expect(events).to_contain_text(f"Round {round_} aggregated from 3 update(s), 3 samples",
                                                 timeout=LIVE_MS)
            await wait_for_notification(clients, "MODEL_TEST_ROUND", round_ + 1)
            for client in clients:
                await client.test(client.received[-1]["body"])
            await expect(chart).to_have_attribute("data-points", str(points), timeout=LIVE_MS)
        await expect(facts).to_contain_text("Completed", timeout=LIVE_MS)
        await expect(page.locator("table.versions tbody tr")).to_have_count(2)
        assert await page.evaluate("() => window.notReloaded") is True
        await watched.screenshot("training-completed")
        assert watched.confirms == ["Start this training?"]
        watched.assert_clean()
    finally:
        await stop_clients(clients)


async def test_actions_for_the_actor_only(http: HttpApi, web: Browsing) -> None:
    actor = await register(http, actor=True)
    bob = await register(http, first_name="Bob")
    carol = await register(http, first_name="Carol")
    training_id = await create_training(http, actor, await upload_model(http, actor, name="actions"))
    path = f"/trainings/{training_id}"
    watched = await web.signed_in(actor, path)
    page = watched.page
    for name in ("Start", "Cancel", "Add participant", "Remove participant"):
        await expect(page.get_by_role("button", name=name, exact=True)).to_be_visible()
    await watched.screenshot("training-actor")
    # Refused by the API (no participants yet): its message is shown and nothing changes.
    await page.get_by_role("button", name="Start").click()
    await expect(page.locator("section.actions [role=alert]")).not_to_be_empty()
    await expect(page.locator("dl.facts")).to_contain_text("Initial")
    for user in (bob, carol):
        await page.get_by_label("User to add").select_option(label=f"Bob ({bob.username})" if user is bob
                                                             else f"Carol ({carol.username})")
        await page.get_by_role("button", name="Add participant").click()
        await expect(page.get_by_label("Participant to remove")).to_contain_text(user.username)
    await page.get_by_label("Participant to remove").select_option(label=f"Carol ({carol.username})")
    await page.get_by_role("button", name="Remove participant").click()
    await expect(page.get_by_label("Participant to remove")).not_to_contain_text(carol.username)
    training = await (await http.get(f"/api/trainings/{training_id}/", headers=actor.headers)).json()
    assert training["participants"] == [bob.id]

    # Bob, a participant, sees the training but no action.
    seen = await web.signed_in(bob, path)
    await expect(seen.page.get_by_role("heading", name="actions")).to_be_visible()
    assert await seen.page.get_by_role("button", name="Start").count() == 0
    assert await seen.page.locator("section.actions").is_hidden()
    await seen.screenshot("training-participant")

    await page.get_by_role("button", name="Start").click()
    await expect(page.locator("dl.facts")).to_contain_text("Ongoing", timeout=LIVE_MS)
    await page.get_by_role("button", name="Cancel").click()
    await expect(page.locator("dl.facts")).to_contain_text("Error", timeout=LIVE_MS)
    await expect(page.locator("ol.events")).to_contain_text("State changed to Error")
    assert len(watched.confirms) == 6  # every action asked first
    watched.assert_clean(allowed_api_errors=("400 /api/trainings/", "409 /api/trainings/"))
    seen.assert_clean()


async def test_unknown_page_and_unknown_training(http: HttpApi, web: Browsing) -> None:
    actor = await register(http, actor=True)
    missing = await web.open("/no/such/page")
    await expect(missing.page.get_by_role("heading", name="Page not found")).to_be_visible()
    await missing.screenshot("not-found")
    assert missing.failed_assets == ["404 /no/such/page"]
    missing.failed_assets.clear()
    missing.assert_clean()
    gone = await web.signed_in(actor, "/trainings/00000000-0000-4000-8000-000000000000")
    await expect(gone.page.get_by_role("heading", name="Training not found")).to_be_visible()
    gone.assert_clean(allowed_api_errors=("404 /api/trainings/",))


async def test_page_reconnects_after_the_service_restarts(service: ServiceProcess, web: Browsing) -> None:
    http = HttpApi(service.base_url)
    clients = await start_clients(http, 2, silent=True)
    try:
        actor = await register(http, actor=True)
        training_id = await create_training(http, actor, await upload_model(http, actor, content=model_bytes()),
                                            target_num_updates=1, clients=[c.account.id for c in clients],
                                            options={"skip_model_tests": True})
        assert (await http.post(f"/api/trainings/{training_id}/start/", headers=actor.headers)).status == 202
        await wait_for_notification(clients, "UPDATE_ROUND_START")
        watched = await web.signed_in(actor, f"/trainings/{training_id}")
        page, count, note = watched.page, watched.page.locator(".progress-count"), watched.page.locator(".live")
        await expect(count).to_have_text("0 / 2 arrived")
        await expect(note).to_have_text("Live: following the training's events.")
        await page.evaluate("() => { window.notReloaded = true; }")
        await asyncio.to_thread(service.stop)
        await expect(note).to_have_text("Connection lost: reconnecting…", timeout=10_000)
        await asyncio.to_thread(service.start)
        await expect(note).to_have_text("Live: following the training's events.", timeout=30_000)
        await http.close()
        http = HttpApi(service.base_url)  # the old connections died with the old process
        for client in clients:
            client.api = http  # type: ignore[assignment]
        await clients[0].train(clients[0].received[-1]["body"])
        await expect(count).to_have_text("1 / 2 arrived", timeout=LIVE_MS)
        await clients[1].train(clients[1].received[-1]["body"])
        await expect(page.locator("dl.facts")).to_contain_text("Completed", timeout=LIVE_MS)
        assert await page.evaluate("() => window.notReloaded") is True
        watched.assert_clean()
    finally:
        await stop_clients(clients)
        await http.close()
