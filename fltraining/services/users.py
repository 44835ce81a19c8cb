"""Users: registration, authentication and deletion with the seed's cascades."""

import asyncio
from datetime import timedelta
from uuid import UUID

from pymongo.errors import DuplicateKeyError

from fltraining.clock import utcnow
from fltraining.documents import Model, Session, Training, User
from fltraining.errors import Conflict, InvalidInput, NotFound
from fltraining.notifications.endpoints import check_endpoint_url
from fltraining.schemas.users import UserCreate
from fltraining.security import PasswordHashing, new_token, token_hash, tokens_match
from fltraining.services.credential_cache import CredentialCache
from fltraining.services.login_throttle import LoginThrottle
from fltraining.services.models import ModelService
from fltraining.storage.batched_lookup import BatchedLookup
from fltraining.storage.queries import count_matching, find_document, in_chunks


class UserService:
    """Every user rule; password hashing runs off the event loop."""

    def __init__(
        self,
        passwords: PasswordHashing,
        models: ModelService,
        cache: CredentialCache,
        throttle: LoginThrottle,
        token_lifetime: timedelta | None = None,
        allow_loopback_endpoints: bool = False,
        session_lifetime: timedelta = timedelta(hours=12),
    ) -> None:
        self._session_lifetime = session_lifetime
        self._allow_loopback = allow_loopback_endpoints
        self._passwords = passwords
        self._models = models
        self._cache = cache
        self._throttle = throttle
        self._token_lifetime = token_lifetime
        # Many clients authenticate at once when a round starts: their credential reads are batched.
        users = User.get_pymongo_collection()
        self._by_token_hash = BatchedLookup(users, "token_hash")
        self._by_username = BatchedLookup(users, "username")

    async def register(self, data: UserCreate) -> tuple[User, str]:
        """Create a user and return it with its token (shown only this once)."""
        if data.message_endpoint is not None:
            # Addresses the service must never call are refused now; names are checked again at delivery.
            check_endpoint_url(str(data.message_endpoint), self._allow_loopback)
        token = new_token()
        password_hash = await asyncio.to_thread(self._passwords.hash, data.password)
        user = User(
            username=data.username,
            email=data.email,
            first_name=data.first_name,
            last_name=data.last_name,
            actor=data.actor,
            client=data.client,
            message_endpoint=str(data.message_endpoint) if data.message_endpoint else None,
            password_hash=password_hash,
            token_hash=token_hash(token),
            token_expires_at=utcnow() + self._token_lifetime if self._token_lifetime else None,
        )
        try:
            await user.insert()
        except DuplicateKeyError as error:
            raise Conflict(f"A user with username '{data.username}' already exists.") from error
        return user, token

    async def by_token(self, token: str, address: str) -> User | None:
        """The user a valid, unexpired token (the user's own, or a sign-in's) belongs to, if any."""
        session_key = self._cache.key("session", token)
        if (signed_in := self._cache.get(session_key)) is not None:
            return signed_in
        key = self._cache.key("token", token)
        user = self._cache.get(key)
        if user is None:
            user = await _read_user(self._by_token_hash, token_hash(token))
            if user is None and (signed_in := await self._session_owner(token)) is not None:
                self._cache.put(session_key, signed_in)
                return signed_in
            if user is None or not tokens_match(user.token_hash, token):
                # 160 random bits cannot be guessed, so a valid token is never refused (clients
                # behind a shared address stay up); failed ones count and turn into 429s.
                await self._throttle.token_failed(address)
                return None
            self._cache.put(key, user)
        return None if user.token_expired(utcnow()) else user

    async def _session_owner(self, token: str) -> User | None:
        """The user an unexpired sign-in token belongs to (the TTL index removes expired ones only later)."""
        session = await Session.get_pymongo_collection().find_one(
            {"token_hash": token_hash(token), "expires_at": {"$gt": utcnow()}}, {"user": 1})
        return None if session is None else await find_document(User, {"_id": session["user"]})

    async def start_session(self, user: User) -> tuple[Session, str]:
        """A new sign-in for the user: its own token (shown only this once) that expires."""
        token = new_token()
        session = Session(user=user.id, token_hash=token_hash(token), expires_at=utcnow() + self._session_lifetime)
        await Session.get_pymongo_collection().insert_one(session.model_dump(by_alias=True))
        return session, token

    async def end_session(self, user: User, token: str) -> bool:
        """Sign out: the user's sign-in with this token ends at once here (within the credential cache's
        lifetime on other processes); False when the token is no sign-in of the user's."""
        ended = await Session.get_pymongo_collection().delete_one({"token_hash": token_hash(token), "user": user.id})
        self._cache.forget(self._cache.key("session", token))
        return ended.deleted_count == 1

    async def by_password(self, username: str, password: str, address: str) -> User | None:
        """The user these credentials belong to, if any (a miss costs one full hash verification)."""
        key = self._cache.key("password", username, password)
        if (cached := self._cache.get(key)) is not None:
            return cached
        # Checked before verifying: past the limit even a right guess is refused.
        await self._throttle.check_password(username, address)
        user = await _read_user(self._by_username, username)
        proven = self._cache.proven(key)
        if user is not None and proven is not None and (proven.id, proven.password_hash) == (user.id, user.password_hash):
            self._cache.put(key, user)  # these credentials matched this very hash before: no slow verification
            return user
        valid = await asyncio.to_thread(
            self._passwords.verify, user.password_hash if user else None, password
        )
        if user is None or not valid:
            self._cache.forget(key)
            await self._throttle.password_failed(username, address)
            return None
        self._cache.put(key, user)
        return user

    async def get(self, user_id: UUID) -> User:
        """One user by id."""
        user = await find_document(User, {"_id": user_id})
        if user is None:
            raise NotFound(f"User {user_id} not found.")
        return user

    async def list_all(self, limit: int = 1000, offset: int = 0) -> list[User]:
        """All users, by username."""
        return await User.find_all().sort("username").skip(offset).limit(limit).to_list()

    async def require_all_exist(self, user_ids: list[UUID]) -> list[UUID]:
        """Return the ids without duplicates, or 400 if any is not a user."""
        unique = list(dict.fromkeys(user_ids))
        users = User.get_pymongo_collection()
        found = sum([await count_matching(users, {"_id": {"$in": chunk}}) for chunk in in_chunks(unique)])
        if found != len(unique):
            raise InvalidInput("Not all provided users were found!")
        return unique

    async def delete(self, user: User) -> None:
        """Delete a user with the seed's cascades: its trainings, its models, its participations."""
        await self._models.delete_trainings({"actor": user.id})
        await Training.get_pymongo_collection().update_many(
            {"participants": user.id},
            {"$pull": {"participants": user.id, "round_participants": user.id},
             "$set": {"last_update": utcnow()}, "$inc": {"version": 1}},
        )
        for model in await Model.find({"owner": user.id}).to_list():
            await self._models.purge(model)
        await Session.get_pymongo_collection().delete_many({"user": user.id})
        await user.delete()
        self._cache.forget_user(user.id)


async def _read_user(lookup: BatchedLookup, value: str) -> User | None:
    """The user a batched lookup finds by this value, or None."""
    raw = await lookup.find(value)
    return None if raw is None else User.model_validate(raw)
