"""The data model. Every table is created by the Alembic migrations in migrations/, never by
create_all(); the classes here must agree with them (tests/test_foundation.py checks)."""

from app.models.catalogue_price import CataloguePrice
from app.models.domain_event import DomainEvent
from app.models.organization import BillingProvider, BillingStatus, Organization, OrganizationAddon
from app.models.outbox_delivery import OutboxDelivery
from app.models.pending_signup import PendingSignup, SignupStatus
from app.models.resubscribe_checkout import ResubscribeCheckout, ResubscribeStatus
from app.models.staff_audit import StaffAuditEntry
from app.models.stripe_event import StripeEvent, StripeEventStatus
from app.models.team import Invitation, InvitationStatus, SubscriptionChange, SubscriptionChangeStatus
from app.models.two_factor import RecoveryCode
from app.models.usage import ApiKey, UsageEvent, UsagePeriodTotal, UsageReport, UsageReportStatus
from app.models.user import User, UserRole
from app.models.whop_event import WhopEvent

__all__ = [
    "ApiKey",
    "BillingProvider",
    "BillingStatus",
    "CataloguePrice",
    "DomainEvent",
    "Invitation",
    "InvitationStatus",
    "Organization",
    "OrganizationAddon",
    "OutboxDelivery",
    "PendingSignup",
    "RecoveryCode",
    "ResubscribeCheckout",
    "ResubscribeStatus",
    "SignupStatus",
    "StaffAuditEntry",
    "StripeEvent",
    "StripeEventStatus",
    "SubscriptionChange",
    "SubscriptionChangeStatus",
    "UsageEvent",
    "UsagePeriodTotal",
    "UsageReport",
    "UsageReportStatus",
    "User",
    "UserRole",
    "WhopEvent",
]
